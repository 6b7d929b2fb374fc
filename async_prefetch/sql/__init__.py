"""SQL: Django's compiler for each query, and the ``= ANY`` array lookup the builders use."""
