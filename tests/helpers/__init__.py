"""Builders and references shared by the test modules, one concern per module (tests/ is on
``sys.path`` under pytest, so they import as ``helpers.<module>``):

* :mod:`helpers.resim_model`: tiny ReSim models, configs built in code, synthetic two-view batches.
* :mod:`helpers.train_net_runner`: ``tools/train_net.py`` run as a user runs it, on the demo config
  shrunk to seconds.
* :mod:`helpers.images`: image files that fail to load, load after conversion, or mix both.
* :mod:`helpers.view_geometry`: the released code's window mapping and grid rule, re-typed.
"""
