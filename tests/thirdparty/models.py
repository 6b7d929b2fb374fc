"""Models tagged through third-party managers, whose prefetchers are not Django's.

Food: taggit's generic ``TaggedItem``; Pet: a ``TaggedItemBase`` through model with a
foreign key; Place: modelcluster's ``ClusterTaggableManager`` over a ``ParentalKey``
through model (its reverse manager, ``tagged_items``, is modelcluster's too).
"""

from __future__ import annotations

from django.db import models
from modelcluster.contrib.taggit import ClusterTaggableManager
from modelcluster.fields import ParentalKey
from modelcluster.models import ClusterableModel
from taggit.managers import TaggableManager
from taggit.models import TaggedItemBase


class Food(models.Model):
    name = models.CharField(max_length=50)
    tags = TaggableManager(blank=True)


class TaggedPet(TaggedItemBase):  # type: ignore[misc]  # untyped base
    content_object = models.ForeignKey("Pet", on_delete=models.CASCADE)


class Pet(models.Model):  # type: ignore[django-manager-missing]  # TaggedPet is Any
    name = models.CharField(max_length=50)
    tags = TaggableManager(through=TaggedPet, blank=True)


class Place(ClusterableModel):  # type: ignore[misc]  # untyped base
    name = models.CharField(max_length=50)
    tags = ClusterTaggableManager(through="TaggedPlace", blank=True)


class TaggedPlace(TaggedItemBase):  # type: ignore[misc]  # untyped base
    content_object = ParentalKey(Place, related_name="tagged_items", on_delete=models.CASCADE)
