"""The shared core: what building and serving both run, so that what is measured is what is served.

Config, device, model resolution, the bundle format, retrieval, prompting, the passage cut, citations, text
helpers, the gold-chunk matcher and the generation engines. It imports nothing else of the project: ``builder``
and ``serving`` import it, never each other, and only the command line (``assistant``) imports both.
"""

__version__ = "0.1.0"
