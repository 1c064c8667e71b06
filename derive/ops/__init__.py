"""The op library: forward mathematics only. Every gradient is derived by derive/."""
