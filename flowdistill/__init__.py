"""flowdistill."""
