"""Applications: the Python entry points of the workflows (calibrate, infer, evaluate) built from the library's
components, for users who call them from their own code rather than through the bundles."""
