"""The quantizers a lossy cache declares, under the name earlier releases gave them; they live on the ground
floor, :mod:`kvverify.protocol` (``from kvverify.protocol import Quantizer``)."""

from kvverify.protocol.quantizers import INT8_PER_TOKEN, KIVI_2, KIVI_4, Quantizer, QuantizerError, kivi
from kvverify.protocol.rounding import Rounding

__all__ = ["INT8_PER_TOKEN", "KIVI_2", "KIVI_4", "Quantizer", "QuantizerError", "Rounding", "kivi"]
