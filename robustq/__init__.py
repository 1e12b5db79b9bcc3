"""robustq: training-time methods for quantization-robust neural networks, reproduced side by side.

Modules: ``quant`` (quantizers), ``ptq`` (model-level PTQ and bit sweeps), ``qat`` (QAT
quantizers), ``regularizers``, ``satnl``, ``sam``, ``methods`` (the registry), ``data``, ``models``,
``train``, ``experiments`` (cached runs), ``plots``, ``kernels`` (the pinned CPU kernels).
"""

from robustq import kernels

kernels.pin()  # before any robustq module imports torch: the book's kernels on every x86-64 machine

__version__ = "0.1.0"
