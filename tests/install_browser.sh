#!/usr/bin/env bash
# Install what the chat web demo's browser test (tests/test_chat.py) needs from Debian:
# chromium and chromium-driver (chromedriver, which selenium drives). The Python side
# (gradio from the "demo" extra, selenium from "dev") comes from pip.
#
# Idempotent: does nothing when both binaries are already there. Never fails the caller:
# where it cannot install (not root, no apt-get, apt failing offline) it says why and
# exits 0, and the browser test then skips with the same reason (or, under
# BLIP2_REQUIRE_BROWSER=1 as in CI, fails with it).
set -u

missing=()
packages=()
command -v chromium >/dev/null 2>&1 || { missing+=(chromium); packages+=(chromium); }
command -v chromedriver >/dev/null 2>&1 || { missing+=(chromedriver); packages+=(chromium-driver); }
if ((${#missing[@]} == 0)); then
  echo "install_browser: chromium and chromedriver already installed"
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "install_browser: missing ${missing[*]} and not root: skipping (the browser test will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: missing ${missing[*]} and no apt-get on this system: skipping (the browser test will skip)"
  exit 0
fi

echo "install_browser: installing ${packages[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent in a fresh container; refresh them only when an install fails.
if ! apt-get install -y -q "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -q >/dev/null 2>&1 || true
  if ! apt-get install -y -q "${packages[@]}"; then
    echo "install_browser: apt-get install failed (offline?): skipping (the browser test will skip)"
    exit 0
  fi
fi
echo "install_browser: done"
exit 0
