"""duquant_ext: DuQuant W4A8 quantization for PyTorch ``nn.Linear`` layers.

    import duquant_ext as dq
    report = dq.quantize_(model, dq.Config(wbits=4, abits=8))
    print(report)

See README.md for the full tour.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from ._C import (Config, LayerPack, PackFile, PackLayerInfo, SafetensorsError, pack_linear,  # noqa: F401
                 read_safetensors, safetensors_metadata)
from .nn import DuQuantLinear  # noqa: F401
from .quantize import (  # noqa: F401
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    QuantizeReport,
    finish_calibration,
    quantize_,
    select_linear_layers,
)
from .pack import LoadReport, load_pack, save_pack  # noqa: F401
from .shared_input import link_shared_inputs  # noqa: F401
from .env import EnvError, EnvReport, EnvSettings, config_from_env, enable_from_env, settings_from_env  # noqa: F401

__all__ = [
    "Config",
    "LayerPack",
    "pack_linear",
    "DuQuantLinear",
    "quantize_",
    "QuantizeReport",
    "select_linear_layers",
    "finish_calibration",
    "DEFAULT_INCLUDE",
    "DEFAULT_EXCLUDE",
    "link_shared_inputs",
    "save_pack",
    "load_pack",
    "LoadReport",
    "PackFile",
    "PackLayerInfo",
    "read_safetensors",
    "safetensors_metadata",
    "SafetensorsError",
    "settings_from_env",
    "config_from_env",
    "enable_from_env",
    "EnvSettings",
    "EnvReport",
    "EnvError",
]
