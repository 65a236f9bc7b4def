"""Enrollment protocols on the wire: one module per protocol (codec, client side, server side)."""
