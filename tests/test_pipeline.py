from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest
from conftest import apply
from models import plain_cnn

from graphslim.core.errors import PassError, PipelineError, VerificationError
from graphslim.pipeline import (
    Pass,
    PassResult,
    Pipeline,
    get_pass,
    parse_pipeline_text,
    register_pass,
    registered_passes,
)


@register_pass
class _Toy(Pass):
    """toy-options: a pass used only to test option parsing."""

    name = "toy-options"

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        count: int = 3
        flag: bool = False
        mode: Literal["a", "b"] = "a"
        names: tuple[str, ...] = ()
        block: tuple[int, ...] = (1, 4)
        text: str = ""
        limit: float | None = None

    def run(self, graph, ctx):
        return PassResult(changed=False)


def test_parse_and_print_roundtrip():
    text = 'fold-batchnorm,toy-options{ratio=0.25,flag=true,mode=b,names=[conv1,"a,b"],block=[16,1],text="x{y}"}'
    p = Pipeline.parse(text)
    opts = p[1].options
    assert (opts.ratio, opts.flag, opts.mode, opts.names, opts.block, opts.text) == (
        0.25,
        True,
        "b",
        ("conv1", "a,b"),
        (16, 1),
        "x{y}",
    )
    assert Pipeline.parse(str(p)) == p
    assert str(Pipeline.parse(str(p))) == str(p)


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(ratio=1e-9),
        dict(count=0, names=("",), text="true"),
        dict(text="0.5"),
        dict(limit=2.5),
        dict(names=("with space", 'q"uote', "back\\slash"), mode="b"),
    ],
)
def test_roundtrip_property(opts):
    p = Pipeline([_Toy(**opts), get_pass("fold-constants")()])
    assert Pipeline.parse(str(p)) == p


def test_defaults_are_not_printed():
    assert str(Pipeline.parse("toy-options{ratio=0.5,count=3}")) == "toy-options"


@pytest.mark.parametrize(
    "text, message",
    [
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("toy-options{ratoi=1}", "has no option 'ratoi' (options: ratio, count"),
        ("toy-options{count=1.5}", "expected an integer"),
        ("toy-options{mode=c}", "not one of a, b"),
        ("toy-options{flag=maybe}", "expected true or false"),
        ("toy-options{ratio=nan}", "finite"),
        ("toy-options{ratio=0.5", "expected '}'"),
        ("toy-options{ratio=1,ratio=2}", "given twice"),
        ("fold-constants,,", "expected a name"),
        ("fold-constants{max_mib=-1}", "max_mib must be > 0"),
    ],
)
def test_errors_name_the_problem(text, message):
    with pytest.raises(PipelineError) as e:
        Pipeline.parse(text)
    assert message in str(e.value)


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(PipelineError) as e:
        Pipeline.parse("nope")
    assert "fold-batchnorm" in str(e.value)


def test_recipe_json_and_yaml(tmp_path):
    items = [
        {"name": "fold-batchnorm"},
        "eliminate-dead-nodes",
        {"name": "toy-options", "options": {"ratio": 0.1, "names": ["a"]}},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"passes": items}))
    (tmp_path / "r.yaml").write_text(
        "- fold-batchnorm\n- eliminate-dead-nodes\n- name: toy-options\n  options: {ratio: 0.1, names: [a]}\n"
    )
    pj, py = Pipeline.from_recipe(tmp_path / "r.json"), Pipeline.from_recipe(tmp_path / "r.yaml")
    assert pj == py == Pipeline.parse("fold-batchnorm,eliminate-dead-nodes,toy-options{ratio=0.1,names=[a]}")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PipelineError, match="not a valid recipe"):
        Pipeline.from_recipe(tmp_path / "bad.json")
    # A recipe written back from a pipeline loads to the same pipeline.
    (tmp_path / "back.json").write_text(json.dumps(pj.to_recipe()))
    assert Pipeline.from_recipe(tmp_path / "back.json") == pj


def test_raw_parse_handles_nesting():
    assert parse_pipeline_text('spiral{passes="prune{ratio=0.2},x",steps=3}') == [
        ("spiral", {"passes": "prune{ratio=0.2},x", "steps": "3"})
    ]


def test_registry_rejects_bad_names_and_mutable_options():
    class Bad(Pass):
        name = "Bad_Name"

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(Bad)

    class NoDefault(Pass):
        name = "no-default"

        @dataclass(frozen=True)
        class Options:
            x: int

    with pytest.raises(TypeError, match="needs a default"):
        register_pass(NoDefault)
    assert "no-default" not in registered_passes()


@register_pass
class _Breaker(Pass):
    """breaker: deliberately changes outputs while claiming to be exact."""

    name = "test-breaker"

    @dataclass(frozen=True)
    class Options:
        crash: bool = False

    def run(self, graph, ctx):
        if self.options.crash:
            raise RuntimeError("boom")
        conv = next(n for n in graph.nodes if n.op == "Conv")
        graph.set_constant(conv, 1, graph.constant(conv.inputs[1]) * 2)
        return PassResult(changed=True)


def test_verify_catches_a_pass_that_breaks_exactness():
    with pytest.raises(VerificationError) as e:
        apply(plain_cnn(), "fold-batchnorm,test-breaker", verify=True)
    msg = str(e.value)
    assert "'test-breaker'" in msg and "fold-batchnorm" in msg and "rtol" in msg
    # Without --verify the same pipeline runs (the change is not detected).
    apply(plain_cnn(), "fold-batchnorm,test-breaker")


def test_crashing_pass_is_named():
    with pytest.raises(PassError, match="pass 'test-breaker{crash=true}' failed: RuntimeError: boom"):
        apply(plain_cnn(), "test-breaker{crash=true}")


@register_pass
class _Liar(Pass):
    """liar: changes the graph and says it did not (through the facade, or behind its back)."""

    name = "test-liar"
    exact = False

    @dataclass(frozen=True)
    class Options:
        behind: bool = False

    def run(self, graph, ctx):
        conv = next(n for n in graph.nodes if n.op == "Conv")
        if self.options.behind:
            conv.inputs[1].values = graph.constant(conv.inputs[1]) * 0.5  # not through the facade
        else:
            graph.set_constant(conv, 1, graph.constant(conv.inputs[1]) * 0.5)
        return PassResult(changed=False)


def test_changed_is_checked_against_the_graph():
    # Through the facade: the manager sees the version move and treats the pass as a change.
    _, recs = apply(plain_cnn(), "test-liar", verify=True)
    assert recs[0].changed is True
    # Behind the facade's back: the fingerprint under --verify catches the lie.
    with pytest.raises(VerificationError, match="reported no change but the graph changed"):
        apply(plain_cnn(), "test-liar{behind=true}", verify=True)


def test_analyses_are_cached_and_only_preserved_ones_survive_a_change():
    from graphslim.core.ir import Graph
    from graphslim.pipeline import PassContext, PassManager

    calls = {"a": 0, "b": 0}

    def analysis_a(graph, ctx):
        calls["a"] += 1
        return len(graph.nodes)

    def analysis_b(graph, ctx):
        calls["b"] += 1
        return len(graph.nodes)

    @register_pass
    class _Keeper(Pass):
        name = "test-keeper"

        @dataclass(frozen=True)
        class Options:
            pass

        def run(self, graph, ctx):
            ctx.analysis(analysis_a, graph)
            ctx.analysis(analysis_b, graph)
            graph.set_attr(next(n for n in graph.nodes if n.op == "Conv"), "dilations", [1, 1])
            return PassResult(changed=True, preserves=(analysis_a,))

    g = Graph.from_model(plain_cnn())
    g.infer_shapes()
    ctx = PassContext()
    PassManager("test-keeper").run(g, ctx)
    assert calls == {"a": 1, "b": 1}
    ctx.analysis(analysis_a, g)  # preserved across the change: not recomputed
    ctx.analysis(analysis_b, g)  # dropped: recomputed
    assert calls == {"a": 1, "b": 2}


def test_passes_listing_pastes_back_as_pipelines(capsys):
    from graphslim.cli import main
    from graphslim.pipeline import Pipeline

    assert main(["passes"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith(" ")]
    assert len(lines) == len(registered_passes())
    for line in lines:
        pipe = Pipeline.parse(line)  # every option printed with its default, in pipeline syntax
        assert str(pipe) == line.split("{")[0]  # defaults print back as the bare name


def test_pipeline_errors_are_one_line():
    with pytest.raises(PipelineError) as e:
        Pipeline.parse("fold-batchnorm,prune-channels{ratio=0.5")
    assert "\n" not in str(e.value) and "column" in str(e.value)
