"""The CNN side: shipped image tasks, small models, training/QAT, the supernet and its searches.

Submodules are imported on demand; importing this package does no work.
"""
