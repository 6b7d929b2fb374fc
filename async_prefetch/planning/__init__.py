"""Planning: prefetch lookups as an ordered graph of levels (Django's serial order
kept where it matters), and Django's errors for bad lookups."""
