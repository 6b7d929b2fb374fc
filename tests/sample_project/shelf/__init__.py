"""The sample project's app: shelves and the books on them."""
