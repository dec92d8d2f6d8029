"""The benchmark suite behind `autojac bench`: problems, contestants, measurement, report."""
