"""Formats: how one token of one KV head is laid out in a page, one descriptor per format
(``quant.FORMATS``), and the quantizer that fills it."""
