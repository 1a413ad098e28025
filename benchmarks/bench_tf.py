"""bnref.tf.BatchNorm against keras.layers.BatchNormalization, both in tf.function, measured
in the same process; tf.compat.v1.nn.fused_batch_norm (TensorFlow's fused kernel) as a third.

    python benchmarks/bench_tf.py [--repeats 9]

float32, training mode, NHWC (64, 56, 56, 64) and (4096, 1024) (fed to the fused kernel as
(4096, 1, 1, 1024)). Forward is one training call of the layer (output and moving-statistic
update); forward+backward also takes the gradient of ``sum(y * dy)`` with respect to the
input and both trainable weights under ``GradientTape``. Neither layer's outer function is
``jit_compile``d: bnref's math is XLA-compiled inside ``batch_norm`` (the forward, and its
analytic gradient as a second compiled function), Keras's is not. Times are medians over
alternating rounds (see ``_timing.py``).

Besides ``_timing.py``'s allocator settings, the script sets ``MALLOC_ARENA_MAX=1``.
TensorFlow allocates kernel outputs on its executor threads, and glibc gives each thread an
arena of its own whose heap, once a freed buffer leaves it empty, goes back to the kernel
whatever ``MALLOC_TRIM_THRESHOLD_`` says: every call then faults its output in afresh, for
either layer (measured: 12545 minor faults, all of the 51 MB ``y``, in most forward calls of
each at (64, 56, 56, 64); 3 such buffers per Keras forward+backward). With one arena those
buffers come from the main heap, which keeps them, as ``_timing.py`` intends.
"""

from __future__ import annotations

import os

from _timing import MemoryFloor, medians, reuse_freed_memory

reuse_freed_memory({"TF_CPP_MIN_LOG_LEVEL": "2", "MALLOC_ARENA_MAX": "1"})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse

import keras
import tensorflow as tf

import bnref.tf as btf

SHAPES = [(64, 56, 56, 64), (4096, 1024)]
TARGET = 0.5


def layer_functions(layer, x):
    layer.build(x.shape)
    weights = layer.trainable_weights

    @tf.function(autograph=False)
    def forward(x):
        return layer(x, training=True)

    @tf.function(autograph=False)
    def forward_backward(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x, *weights], output_gradients=dy)

    return forward, forward_backward


def fused_functions(x):
    channels = x.shape[-1]
    as_4d = [x.shape[0], 1, 1, channels] if x.shape.rank == 2 else x.shape
    scale, offset = tf.Variable(tf.ones(channels)), tf.Variable(tf.zeros(channels))

    def run(x):
        return tf.compat.v1.nn.fused_batch_norm(tf.reshape(x, as_4d), scale, offset,
                                                epsilon=1e-3, is_training=True)[0]

    @tf.function(autograph=False)
    def forward(x):
        return run(x)

    @tf.function(autograph=False)
    def forward_backward(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = run(x)
        return tape.gradient(y, [x, scale, offset], output_gradients=tf.reshape(dy, as_4d))

    return forward, forward_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, float32, CPU, "
          f"{os.cpu_count()} cores, medians over 5 alternating rounds of {args.repeats} calls")
    header = (f"{'shape':<18} {'pass':<17} {'keras ms':>9} {'bnref ms':>9} {'ratio':>6} "
              f"{'fused ms':>9} {'fused/keras':>11} {'keras/floor':>11} {'bnref/floor':>11} "
              f"target")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        x = tf.random.normal(shape, seed=1)
        dy = tf.random.normal(shape, seed=2)
        floor = MemoryFloor(x.shape.num_elements() * 4)
        keras_fns = layer_functions(keras.layers.BatchNormalization(), x)
        our_fns = layer_functions(btf.BatchNorm(), x)
        fused_fns = fused_functions(x)
        for index, kind in enumerate(("forward", "forward+backward")):
            def timed(fns, index=index, x=x, dy=dy):
                fn = fns[index]
                return (lambda: fn(x)) if index == 0 else (lambda: fn(x, dy))

            t_keras, t_ours = medians(timed(keras_fns), timed(our_fns), args.repeats)
            _, t_fused = medians(timed(keras_fns), timed(fused_fns), max(3, args.repeats // 3))
            ratio = t_ours / t_keras
            verdict = "ok" if ratio <= TARGET else "MISSED"
            print(f"{shape!s:<18} {kind:<17} {1e3 * t_keras:9.2f} {1e3 * t_ours:9.2f} "
                  f"{ratio:6.2f} {1e3 * t_fused:9.2f} {t_fused / t_keras:11.2f} "
                  f"{floor.ratio(t_keras, kind):11.2f} {floor.ratio(t_ours, kind):11.2f} "
                  f"<= {TARGET} {verdict}")


if __name__ == "__main__":
    main()
