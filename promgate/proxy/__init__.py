"""The protocol factories: one module per way into the gateway."""
