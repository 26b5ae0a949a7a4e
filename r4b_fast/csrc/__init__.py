"""CUDA sources, shipped as package data and compiled at first use by r4b_fast._cuda_build."""
