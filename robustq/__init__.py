"""robustq: training-time methods for quantization-robust neural networks, reproduced side by side.

Modules: ``quant`` (quantizers), ``ptq`` (model-level PTQ and bit sweeps), ``qat`` (QAT
quantizers), ``regularizers``, ``satnl``, ``sam``, ``methods`` (the registry), ``data``, ``models``,
``train``, ``experiments`` (cached runs), ``plots``.
"""

__version__ = "0.1.0"
