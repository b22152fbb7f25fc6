"""JAX's persistent compilation cache, on by default, so a second process skips compiling the same programs.

Location: ``$NESTLEARN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/nestlearn/jax/<jax>-<jaxlib>``
(``~/.cache/nestlearn/jax/0.10.2-0.10.2``: one folder per JAX version, so entries an older JAX wrote are
never read by a newer one and can be deleted as a whole). ``NESTLEARN_COMPILATION_CACHE=0`` turns it off,
``NESTLEARN_CACHE_MIN_SECONDS`` sets the shortest compilation worth caching (default 0.2 s); a
``jax_compilation_cache_dir`` the user configured before importing nestlearn is left alone. Built on
``jax.config``'s ``jax_compilation_cache_dir``.

A damaged entry (a process killed while JAX wrote it: JAX writes entries in place, not atomically) is
not fatal with this JAX: reading it fails with a warning ("Error reading persistent compilation cache
entry") and the program is compiled again, but the entry stays and the warning comes back every run;
delete the cache folder (:func:`default_cache_dir`) to heal it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

# Programs that compile faster than this are not worth a disk round trip (JAX's default is 1 s; most of a
# small run's programs compile in 0.2-1 s, and together they are its cold start).
MIN_COMPILE_SECONDS = 0.2


def default_cache_dir() -> Path:
    """Where the cache lives unless told otherwise (see the module docstring)."""
    if os.environ.get("NESTLEARN_CACHE_DIR"):
        return Path(os.environ["NESTLEARN_CACHE_DIR"]).expanduser()
    import jaxlib

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nestlearn" / "jax" / f"{jax.__version__}-{jaxlib.__version__}"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at ``directory`` (default :func:`default_cache_dir`).

    Returns the directory in use, or ``None`` when the cache is off (``NESTLEARN_COMPILATION_CACHE=0``, or
    a directory that cannot be created: the run goes on without a cache).

    Example:
      >>> enable_compilation_cache("/tmp/my-cache")  # doctest: +SKIP
      PosixPath('/tmp/my-cache')
    """
    if directory is None:
        if os.environ.get("NESTLEARN_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        configured = jax.config.jax_compilation_cache_dir
        if configured:
            return Path(configured)
        directory = default_cache_dir()
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    seconds = float(os.environ.get("NESTLEARN_CACHE_MIN_SECONDS", MIN_COMPILE_SECONDS))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
