#!/usr/bin/env bash
# Sourced by the scripts that pack carries for a lent GPU machine: a call carries 64 MiB, the working tree (every
# tracked file) included. carry_room prints the bytes left for one carried folder beside today's tree, less a
# margin for the tree growing between packing and the call.
carry_room() {
  local tree
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  echo $((64 * 1024 * 1024 - 1500000 - tree))
}
