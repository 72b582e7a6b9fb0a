"""Config files are plain Python files passed by path (``--config configs/demo.py``); they are not
part of the installed package. A config that builds on another loads it by path with
``sibling``, so it works from any working directory and never imports a ``configs`` package
(which could be some other installed project's)."""

import importlib.util
import os


def sibling(config_file: str, name: str):
    """The ``get_config()`` of ``<name>.py`` in the folder of ``config_file``.

    Args:
      config_file: the calling config's ``__file__``.
      name: the other config's file name without ``.py`` (e.g. "default").

    Returns:
      That file's ``get_config`` function.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"jaxmm_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config
