placeholder for the example root
