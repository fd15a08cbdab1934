#!/usr/bin/env bash
# How the carried files of .gpu/ and .whl/ were made (on this x86-64 Debian 12 machine, ~5 min of one core,
# mostly xz). Needs: the project venv, Debian's openjdk-17-jdk-headless (jlink + jmods), MNIST in
# ~/.cache/digits/data. Run from the repo root: bash .gpu/build.sh
set -euo pipefail
B=${B:-/tmp/gpubuild}
PY=.venv/bin/python
rm -rf "$B" && mkdir -p "$B/ts-stage" "$B/mnist" .whl
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$B" torchserve==0.12.0 torch-model-archiver==0.12.0
cp "$B"/torch_model_archiver-0.12.0-py3-none-any.whl .whl/
(cd "$B/ts-stage" && unzip -q "$B"/torchserve-0.12.0-py3-none-any.whl)
$PY .gpu/repack_jar.py "$B/ts-stage/ts/frontend/model-server.jar" "$B/model-server.jar"
mv "$B/model-server.jar" "$B/ts-stage/ts/frontend/model-server.jar"
nice tar -C "$B/ts-stage" -cf - ts torchserve-0.12.0.dist-info | nice xz -9 -T1 >.gpu/torchserve.tar.xz
# java.desktop is needed: TorchServe's frontend loads java.beans.PropertyChangeEvent at start-up
/usr/lib/jvm/java-17-openjdk-amd64/bin/jlink \
    --add-modules java.base,java.desktop,java.logging,java.management,java.naming,java.sql,java.xml,java.net.http,java.scripting,java.security.jgss,java.instrument,jdk.unsupported,jdk.crypto.ec,jdk.zipfs,jdk.management \
    --strip-debug --no-header-files --no-man-pages --compress=0 --output "$B/jre"
mkdir -p "$B/jre/extra-lib" && cp -L /lib/x86_64-linux-gnu/libz.so.1 "$B/jre/extra-lib/"
nice tar -C "$B" -cf - jre | nice xz -9 -T1 >.gpu/jre.tar.xz
cp -a ~/.cache/digits/data/MNIST "$B/mnist/"
nice tar -C "$B/mnist" -cf - MNIST | nice xz -9 -T1 >.gpu/mnist.tar.xz
ls -la .gpu .whl
