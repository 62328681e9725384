"""The one-line messages of errors that are bad input or the machine's state (errors.one_line)."""

import errno

from featurecache.errors import one_line


def test_a_failure_of_the_machine_or_the_input_is_one_line_and_a_bug_is_none():
    assert one_line(PermissionError(errno.EACCES, "Permission denied", "/data/out.h5"), "extract") \
        == "/data/out.h5: Permission denied"
    nan = one_line(ValueError("Input X contains NaN.\nsecond line"), "fit")
    assert nan.startswith("the features hold NaN or infinity (Input X contains NaN.)") and "\n" not in nan
    oom = one_line(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"), "fit")
    assert oom.startswith("out of memory (DefaultCPUAllocator") and oom.endswith("--memory-limit (training "
                                                                                 "features above it are streamed "
                                                                                 "from the file)")
    assert one_line(MemoryError(), "nosuchcommand") == "out of memory (MemoryError); work on fewer images at a time"
    # Bugs keep their traceback: the command line re-raises what this does not explain.
    assert one_line(RuntimeError("shape mismatch"), "fit") is None
    assert one_line(ValueError("something else"), "fit") is None
    assert one_line(KeyError("x"), "fit") is None
