"""xenrun's builtin plugins, one module per selectable name. Each uses only the public
API (``xenrun.api``), so it reads exactly like a third-party plugin; the registry
(``xenrun.registry``) maps the names to these modules."""
