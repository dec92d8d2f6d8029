"""The public functions, behind `autojac/__init__.py`."""
