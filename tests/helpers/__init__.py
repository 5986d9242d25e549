"""Helpers shared by the test modules: exact references (brute-force allocation, small problems with their dense
Hessians) and Hydra config composition. Test modules import from here, never from one another."""
