"""pdserve.loadtest"""
