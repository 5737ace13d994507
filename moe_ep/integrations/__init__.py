"""Integrations with other frameworks. Each is imported on its own (`import
moe_ep.integrations.transformers`), so that moe_ep itself needs none of them."""
