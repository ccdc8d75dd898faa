"""kasuhara-ari: protects call-centre staff from customer harassment on Asterisk (see README.md).

The version has one source, ``pyproject.toml``; at run time it is the installed distribution's
(``kasuhara --version``, ``importlib.metadata.version("kasuhara-ari")``).
"""
