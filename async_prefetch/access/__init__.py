"""What happens when code reads the instances a call returned.

The stage after hydration. Every instance the engine builds carries a fetch mode
(``instance._state.fetch_mode``, Django 6.1's slot, back-ported to 5.2 by :mod:`.hooks`):
a :class:`~.modes.PrefetchMode` that knows the call it came from and its lookup path.
When code then reaches a relation that was not prefetched, the mode decides:

- auto-prefetch (:mod:`.auto`): fetch it through the engine for every peer (the
  instances the same query produced) at once;
- learned plans (:mod:`.learn`): remember the path for the call site's next call;
- in an event loop: raise an error naming the lookup to add, instead of Django's bare
  ``SynchronousOnlyOperation``.

:mod:`.hooks` is the only module that patches Django's descriptors; it does so on first
use of these features.
"""
