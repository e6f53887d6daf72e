"""DICOM node: receive studies, write SR and SC, deliver results."""
