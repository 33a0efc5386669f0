"""kvshipd: the asyncio (uvloop) data plane, the aiohttp control plane, config, signals."""

from .config import Config, ConfigError, load_config
from .server import Daemon

__all__ = ["Config", "ConfigError", "Daemon", "load_config"]
