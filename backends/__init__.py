"""Built-in backend plugins.  Each subpackage is a pluggy plugin (``<name>/plugin.py``)."""
