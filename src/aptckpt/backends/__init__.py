"""Built-in storage backends: ``torch``, ``zstd``. Each is one module and one class."""
