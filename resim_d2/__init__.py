"""resim_d2: ReSim region-similarity pre-training and transfer, as a detectron2 extension.

Importing the package adapts detectron2 v0.6 to the installed libraries (:mod:`resim_d2.compat`)
and registers the project's components in detectron2's registries and catalogs.
"""

from . import compat

compat.apply()

from . import data  # noqa: E402,F401,I001  (registers the pre-training datasets)
from . import modeling  # noqa: E402,F401  (registers the ReSim meta-architecture)
from .config import add_resim_config, get_config_file  # noqa: E402
from .layers.poolers import register_prroi_pooler  # noqa: E402
from .utils.synthetic_detection import register_synthetic_voc  # noqa: E402

register_prroi_pooler()  # POOLER_TYPE: "PrRoIPool" in detectron2's box/mask heads
register_synthetic_voc()

__version__ = "0.1.0"
__all__ = ["add_resim_config", "get_config_file", "compat"]
