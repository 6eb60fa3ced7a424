"""Built-in codecs, one module each (each registers its codec); `kvpack.get_codec` / `kvpack.list_codecs` import
them all on first use. `compose` holds the codecs made of other codecs (identity, per KV head)."""
