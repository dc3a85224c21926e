"""kairos_jax.parallel.tpu_flags: the TPU compiler flags set by default, a user's own value kept."""

from kairos_jax.parallel import tpu_flags

FLAGS = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false",
         "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")


def test_defaults_are_added_to_an_unset_or_unrelated_value():
    env = {}
    assert tpu_flags.apply_defaults(env) == " ".join(FLAGS) == env["LIBTPU_INIT_ARGS"]
    env = {"LIBTPU_INIT_ARGS": "--xla_tpu_scoped_vmem_limit_kib=65536"}
    tpu_flags.apply_defaults(env)
    assert env["LIBTPU_INIT_ARGS"].split() == [*FLAGS, "--xla_tpu_scoped_vmem_limit_kib=65536"]
    assert tpu_flags.apply_defaults(env) == env["LIBTPU_INIT_ARGS"]          # applying twice adds nothing
    assert env["LIBTPU_INIT_ARGS"].split() == [*FLAGS, "--xla_tpu_scoped_vmem_limit_kib=65536"]


def test_a_flag_the_user_sets_keeps_the_users_value_and_the_opt_out_adds_nothing():
    env = {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_windowed_einsum_for_all_gather=true"}
    tpu_flags.apply_defaults(env)
    assert env["LIBTPU_INIT_ARGS"].split() == [FLAGS[1], "--xla_tpu_enable_windowed_einsum_for_all_gather=true"]
    env = {"KAIROS_TPU_DEFAULT_FLAGS": "0"}
    assert tpu_flags.apply_defaults(env) == "" and "LIBTPU_INIT_ARGS" not in env
