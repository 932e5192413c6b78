"""Colour correction of a restored image against a reference (wavelet, AdaIN)."""
