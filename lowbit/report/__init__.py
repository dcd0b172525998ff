"""Reports and plots of what quantization did."""

from lowbit.report.plots import plan_heatmap

__all__ = ["plan_heatmap"]
