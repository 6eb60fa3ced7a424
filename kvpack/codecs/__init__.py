"""Built-in codecs; importing this package registers them (done lazily by `kvpack.get_codec`)."""

from kvpack.codecs import fp  # noqa: F401
