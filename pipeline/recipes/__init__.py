"""Bundled recipe presets, loadable by name (`quantpipe run fp8`)."""
