"""Command-line interface: parses arguments into config objects and calls the library."""
