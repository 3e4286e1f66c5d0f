"""dtrak_core: data attribution for diffusion models (D-TRAK and relatives).

Stages, one module each: ``datasets`` (data) -> ``models`` / ``training`` / ``generation``
(model) -> features -> scores -> evaluation. The app and the CLI are thin layers over it.
"""

__version__ = "0.1.0"
