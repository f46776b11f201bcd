"""Tests of wgan_lit; a package so ``tests.conftest`` is ours, not a same-named package in site-packages."""
