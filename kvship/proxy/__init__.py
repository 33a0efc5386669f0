"""``kvship proxy``: the PrfaaS serving front (OpenAI-compatible) over local PD servers and
remote prefill servers; see docs/prfaas.md."""
