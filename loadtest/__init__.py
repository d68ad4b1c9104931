"""Load tests of the Retrieve service: the locustfile, a bounded headless run, the step load."""
