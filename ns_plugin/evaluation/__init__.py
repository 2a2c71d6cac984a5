"""Evaluation: corruption/shift data sets in EasyRobust's folder layout, the robustness suite, mCE and the
paper's averages, and robustbench-style leaderboard entries."""
