"""The top-level API names resolve to the documented functions, whatever was imported before."""
from __future__ import annotations

import importlib

import pytest

import midasflow


@pytest.mark.parametrize("name", sorted(midasflow._LAZY))
def test_top_level_names_are_the_documented_objects(name):
    importlib.import_module("midasflow.refinement.engine")  # a subpackage must not shadow an API name
    obj = getattr(midasflow, name)
    module = importlib.import_module(midasflow._LAZY[name])
    assert obj is getattr(module, name)
    assert callable(obj)


def test_refine_and_run_are_the_pipeline_functions():
    from midasflow import pipeline

    assert midasflow.refine is pipeline.refine and midasflow.run is pipeline.run


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        midasflow.nope  # noqa: B018
