"""The kernel table (kernels/table.py): every entry names a block function its builder defines, so
going from an ``ops`` call's ``table.<name>`` to the builder reaches the arithmetic; the loops fit
the block functions' parameters."""

import inspect

from hvdquant.kernels import arith, cpu, table


def test_every_kernel_is_defined_by_its_builder():
    assert len({k.name for k in table.KERNELS}) == len(table.KERNELS) >= 27
    for k in table.KERNELS:
        assert k.builder in arith.BUILDERS, k.name
        where = k.builder.__module__
        assert f"    def {k.name}(" in inspect.getsource(k.builder), f"{k.name} is not defined in {where}"
        assert getattr(table, k.name) is k


def test_builders_take_only_what_earlier_builders_give():
    given = {"tally", "sync"}
    for part in arith.BUILDERS:
        needs = set(inspect.signature(part).parameters) - {"jit", "leaf"}
        assert needs <= given, f"{part.__module__} needs {sorted(needs - given)} before they are built"
        given |= set(vars(part(lambda f: f, lambda f: f, **{n: None for n in needs})))


def test_loops_pass_every_block_argument():
    """Index kernels drop the index, range kernels the range and scratch, span kernels also ``row``
    (passed as the range's index): the rest are the kernel's own parameters, in order."""
    code = cpu._f.dqsg_encode_fields.py_func.__code__
    src = table.loop_source(table.dqsg_encode_fields, code.co_varnames[:code.co_argcount], cpu.LOOPS)
    own = "g, delta, bucket, levels, radix, per_word, words, counts"
    assert f"def dqsg_encode_fields(nb, n, span, {own}, step, tid, sender, ranks, key0, key1):" in src
    assert f"(b * span, min(n, (b + 1) * span), s0, s1, {own}, b, step, tid, sender, ranks, key0, key1)" in src


def test_gpu_phases_take_their_parameters_by_name():
    """A span kernel's GPU loop runs its phases on the units of the range: each phase gets the
    parameters it names, the scratch as views at its unit, the block's shared histogram in row 0."""
    from hvdquant.kernels.cuda import LOOPS  # the simulator or a GPU: tests/conftest.py

    def names(f):
        code = f.py_func.__code__
        return code.co_varnames[:code.co_argcount]

    f = cpu._f
    src = table.loop_source(table.dqsg_encode_fields, names(f.dqsg_encode_fields), LOOPS, False,
                            {p: names(getattr(f, p)) for p, _ in table.dqsg_encode_fields.phases})
    assert ("_quantize_symbols(a, min(i1, a + (4)), s0[a - i0:], s1[a - i0:], g, delta, bucket, levels, hist, 0, "
            "step, tid, sender, ranks, key0, key1)") in src
    assert "_symbol_words(a, min(i1, a + (per_word)), s1[a - i0:], radix, per_word, words)" in src
    assert src.index("_quantize_symbols") < src.index("_symbol_words") and src.count("cuda.syncthreads()") == 3
